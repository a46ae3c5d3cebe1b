"""Bad config values and unreachable services fail early, naming the field and what to do."""

from __future__ import annotations

from pathlib import Path

import dagster as dg
import pytest

from seg_pipeline.contracts import BandStatistics, Catalog, ShardSet, SplitTable
from seg_pipeline.defs.pipeline.ingest import tile_headers
from seg_pipeline.defs.resources import StorageResource
from seg_pipeline.inference.windows import window_grid
from seg_pipeline.settings import KDStageSettings, PredictSettings, PretrainSettings, SettingsError
from seg_pipeline.tracking import TrackingSettings, TrackingUnavailableError
from seg_pipeline.training.sources import TrainingSource
from seg_pipeline.workflows.stage import StageJob, run_stage
from seg_pipeline_tests.defs.cli_helpers import instance_for


@pytest.mark.parametrize(
    ("fields", "message"),
    [
        ({"optimizer": {"lr": -1e-3}}, r"optimizer.lr=-0.001: Input should be greater than 0"),
        (
            {"optimizer": {"weight_decay": -0.1}},
            r"optimizer.weight_decay=-0.1: Input should be greater than or",
        ),
        ({"kd": {"alpha": 1.5}}, r"kd.alpha=1.5: Input should be less than or equal to 1"),
        ({"kd": {"temperature": 0}}, r"kd.temperature=0: Input should be greater than 0"),
        ({"loop": {"epochs": 0}}, r"loop.epochs=0: Input should be greater than or equal to 1"),
        (
            {"model": {"encoder": "resnet19"}},
            r"model.encoder='resnet19': unknown to segmentation_models",
        ),
        ({"loss": {"name": "ce+dicee"}}, r"loss.name='ce\+dicee': join distinct terms"),
    ],
)
def test_impossible_training_values_are_refused_with_the_field_name(fields: dict, message: str) -> None:
    with pytest.raises(SettingsError, match=message):
        KDStageSettings.parse(fields, "kd_student_model")


def test_overlap_not_smaller_than_window_is_refused() -> None:
    with pytest.raises(ValueError, match="overlap"):
        window_grid(100, 100, window=64, overlap=64)
    with pytest.raises(SettingsError, match="overlap=64 must be smaller than window=64"):
        PredictSettings.parse({"windows": {"window": 64, "overlap": 64}})


def _missing_shards(root: Path) -> ShardSet:
    catalog = Catalog(
        dataset_id="demo", raw_dir=str(root), catalog_path=str(root / "missing.parquet"),
        quarantine_path=str(root / "q.json"), class_names=["a", "b"], ignore_index=255, bands=3,
        normalization=BandStatistics(mean=[0, 0, 0], std=[1, 1, 1]), n_tiles=0, n_ok=0, n_labeled=0,
        n_quarantined=0, quarantine_limit=0.5, content_hash="x",
    )  # fmt: skip
    splits = SplitTable(
        dataset_id="demo", splits_path="x", counts={}, policy="v0", seed=0, grouped=False, content_hash="x"
    )
    return ShardSet(
        dataset_id="demo",
        dataset_dir=str(root / "missing"),
        manifest_path="x",
        catalog=catalog,
        splits=splits,
        items={},
        tile_format="tif",
        data_version="x",
    )


def test_unreachable_tracking_server_fails_before_any_training(tmp_path: Path) -> None:
    import socket

    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    target = _missing_shards(tmp_path)
    job = StageJob(
        stage="pretrain",
        settings=PretrainSettings(),
        target=target,
        sources=[TrainingSource(shards=target)],
        checkpoint_dir=str(tmp_path / "ckpt"),
        spec={"encoder": "resnet18", "num_classes": 2},
        tracking=TrackingSettings(tracking_uri=f"http://127.0.0.1:{port}"),
    )
    with pytest.raises(TrackingUnavailableError, match=f"127.0.0.1:{port}"):
        run_stage(job)
    assert not (tmp_path / "ckpt").exists()


def test_unknown_config_key_is_rejected_by_dagster_naming_the_key(tmp_path: Path) -> None:
    with pytest.raises(dg.DagsterInvalidConfigError, match="learning_rate"):
        dg.materialize(
            [tile_headers],
            partition_key="demo",
            instance=instance_for("demo"),
            resources={"storage": StorageResource(data_root=str(tmp_path))},
            run_config=dg.RunConfig(ops={"tile_headers": {"config": {"learning_rate": 0.1}}}),
        )
